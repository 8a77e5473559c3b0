"""Images: image sets in and out (io: uint8, .npz, folders), pictures of samples (grids: grids, PNG, GIF), and
the sampling animation (animation)."""
