"""Server side of vfio-user: devices, PCI config space, regions, interrupts, DMA access."""
