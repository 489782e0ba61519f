"""Data: synthetic generators and dataset readers/writers. `head_samples`: random heads of a
FLAME-layout model rendered from a rig (the foundation's demo)."""
