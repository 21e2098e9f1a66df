"""Helpers shared by the tests (not tests themselves): configs, ports, tar shards, fake run directories, the
RayJob validator."""
