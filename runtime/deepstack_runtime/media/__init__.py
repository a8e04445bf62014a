"""Media the servers take as bytes: what the router learns from headers alone (format and
size of an image, the visual tokens it becomes) and how an encode pod decodes it within a
pixel budget. Torch-free: the router imports this and never decodes pixels."""
