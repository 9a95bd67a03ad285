"""The guest side of a pod VM.  Standard library only: it runs on the guest's python3, which is
the host's ``/usr/bin/python3`` over a read-only 9p export, without podshim's dependencies."""
