"""Writers: Ducho's per-item layout, atomic writes, run records."""
