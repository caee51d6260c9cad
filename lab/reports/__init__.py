"""What the lab prints and writes for people: the comparison of a grid's variants, a sweep's
best and max-stable learning rates, the variant table and `gatelab analyze`."""
