"""Third-party imports that need care: asyncssh, imported without the warnings it is known to raise harmlessly.

The client (``transfer/ssh.py``) and the test server
(``testing/embedded_server.py``) take asyncssh from here, so that a fresh
install prints nothing of a dependency's on any command.
"""

from __future__ import annotations

import warnings


def import_asyncssh():
    """``import asyncssh``, without cryptography's DSA deprecation warnings at import.

    cryptography 51 deprecates DSA, and asyncssh (2.24.1 at least) names
    cryptography's DSA classes in type unions and annotations evaluated when
    its modules load: five ``CryptographyDeprecationWarning``\\ s on every
    command, whether or not a DSA key is anywhere near. Only those are
    silenced, and only while asyncssh is imported: a DSA key that is really
    used still warns, and so does anything else.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh(\.|$)")
        import asyncssh
    return asyncssh
