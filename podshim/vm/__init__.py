"""The pod utility VM: its image (kernel + initramfs) and the qemu process that runs it."""
