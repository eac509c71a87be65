"""Strata's KV-cache store: block identity, block format, the store node and its client.

A library first, a server second: importing ``kvstore`` pulls in nothing heavy, and the package
imports neither ``controlplane`` nor ``dataplane`` nor ``strata`` (see kvstore/README.md).
Import the module you need, e.g. ``from kvstore.blocks.hashing import block_keys`` or
``from kvstore.client.sync import KVStoreClient``.
"""
