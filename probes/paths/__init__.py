"""Path evidence shared by the mesh and the command line: the operator's prefix-to-ASN table."""
