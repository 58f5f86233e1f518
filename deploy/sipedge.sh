#!/bin/sh
# /usr/bin/sipedge: the installed entry point (make install). The program lives in its own virtual
# environment under /opt/sipedge; SIPEDGE_ROOT runs a staged tree (make install DESTDIR=...) in place.
exec "${SIPEDGE_ROOT:-}/opt/sipedge/bin/python" -m edge.cli "$@"
