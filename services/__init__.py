"""Ray Serve deployments, gRPC servicers and clients of LatentWire."""
