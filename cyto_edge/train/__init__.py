"""Training side (PyTorch). Importing this package does not import torch; submodules that need it do."""
