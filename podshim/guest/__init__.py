"""The guest side of a pod VM.  Standard library only: it runs on the guest's python3, Debian's
``/usr/bin/python3`` copied with the modules it imports into the guest's initramfs
(:mod:`podshim.vm.layer`), without podshim's dependencies."""
