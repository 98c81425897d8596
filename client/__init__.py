"""The hospital side: Flower ClientApp, node data resolution, run settings and the weights' wire format."""
