"""p2pser: decentralized speech emotion recognition over ZeroMQ gossip."""

__version__ = "0.1.0"
