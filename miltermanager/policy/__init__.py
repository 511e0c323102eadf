"""Per-recipient policy read from LDAP: which children run, are bypassed or only evaluated."""
