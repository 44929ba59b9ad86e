"""The sync: reaching a cluster over SSH, downloading its checkpoints, status."""
