"""Super-resolution: ×2 of the 10 m bands and 20 m → 10 m sharpening."""
