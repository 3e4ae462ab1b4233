"""
A twistd log observer factory writing one JSON object per event to
standard output, for C{twistd --logger=jsonlog.observer}: what
C{twist --log-format=json} does, for the benchmark's twistd rows (the
gateway's access log as it runs in production, not as text).
"""

import sys

from twisted.logger import jsonFileLogObserver


def observer():
    return jsonFileLogObserver(sys.stdout)
