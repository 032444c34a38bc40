"""The checks, one module per group of the specification.

Importing this package registers them all.  They run in the order they register: the
order of the imports below (so not sorted), then each module's own order;
:func:`~virtblk.tools.check.runner.ordered_checks` moves the disruptive ones last.
"""

# isort: off
from virtblk.tools.check.checks import vhost_user  # noqa: F401  (imported to register)
from virtblk.tools.check.checks import config  # noqa: F401
from virtblk.tools.check.checks import flush  # noqa: F401
from virtblk.tools.check.checks import requests  # noqa: F401
from virtblk.tools.check.checks import limits  # noqa: F401
from virtblk.tools.check.checks import out_of_range  # noqa: F401
from virtblk.tools.check.checks import unsupported  # noqa: F401
from virtblk.tools.check.checks import malformed  # noqa: F401
from virtblk.tools.check.checks import packed  # noqa: F401
# isort: on
