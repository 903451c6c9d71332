"""What ships to the device. Never imports torch, `cyto_edge.train` or `cyto_edge.export`."""
