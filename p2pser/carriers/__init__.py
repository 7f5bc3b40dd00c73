"""Carriers carry out the algorithms' effects: ``realtime`` (ZeroMQ, wall clock) and ``simulated`` (memory,
virtual clock), both through one ``mailbox``."""

# Messages queued per neighbour before further sends to it are dropped: the ZeroMQ send queue of a real
# peer, and the simulator's model of it, so a dead neighbour costs the same in both.
SEND_QUEUE_LIMIT = 16
