"""Examples of building on the foundation: each module a resource, never imported by the foundation."""
