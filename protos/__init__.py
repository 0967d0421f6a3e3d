"""Protobuf definitions (package latentwire.v1) and their generated Python modules."""
