"""Sans-io vfio-user protocol core: bytes and fd counts in, typed messages out.

Imports neither trio nor socket.
"""
