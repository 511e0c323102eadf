"""Process-wide hooks for what happens off the event stream (body spooling, DNSBL, LDAP).

The metrics (miltermanager.metrics) set them while they run; each is None
otherwise, so the modules that report pay one module attribute test.
Each is called with plain values and must be quick and must not raise.
"""

# body_spooled(size): a message body that went to a temporary file was freed; size in bytes.
body_spooled = None
# dnsbl_lookup(result, seconds): a DNSBL lookup ended; result is "listed", "not_listed" or
# "timeout"; seconds is None when the cache answered.
dnsbl_lookup = None
# ldap_lookup(result): a recipient's policy was asked; result is "hit" (cached), "shared"
# (joined a search already running) or "miss" (a search started).
ldap_lookup = None
# ldap_search(ok, seconds): an LDAP policy search ended; ok is False when it failed or timed out.
ldap_search = None
