"""What the lab prints and writes for people: the comparison of a grid's variants, the
variant table and `gatelab analyze`."""
