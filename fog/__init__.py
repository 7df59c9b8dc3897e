"""The fog tier: a fog node runs its share of the edge part (docs/eddl.md)."""
