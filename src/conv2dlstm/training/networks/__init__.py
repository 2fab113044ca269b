"""The networks, one module each, registered in :data:`conv2dlstm.config.networks.NETWORKS`; their shared
contract (skip from the last input frame, output floor) is :mod:`conv2dlstm.training.networks.common`."""
