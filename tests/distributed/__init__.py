"""Worker scripts launched by torchrun from the distributed tests, and the helpers that launch them."""
