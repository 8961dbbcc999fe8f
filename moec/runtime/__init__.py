"""Scripts that moec runs in a subprocess against a generated package (they import torch; moec does not)."""
