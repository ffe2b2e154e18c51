"""Wire formats and the canonical domain vocabulary of blackroad-streams."""
