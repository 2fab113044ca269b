"""Training libraries: the networks, the data loader, the training loop, devices, several processes and preemption.

Importing this package keeps the host memory torch frees in the process
(:func:`conv2dlstm.training.hostmemory.retain_freed_memory`): every process that runs a network
imports it, and no data step does.
"""

from conv2dlstm.training.hostmemory import retain_freed_memory

retain_freed_memory()
