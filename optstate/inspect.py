"""``optstate.inspect``: the name under which :mod:`optstate.memory` was first published.

Kept so that code written against it keeps working; new code should use ``optstate.memory``.
"""

from optstate.memory import *  # noqa: F401,F403
from optstate.memory import __all__  # noqa: F401
from optstate.quantization.array import is_quantized  # noqa: F401,E402  (importable here before)
