"""The pre-training loop of `macrl-pretrain`: transformers' Trainer with MACRL's momentum branch, data and outputs."""
