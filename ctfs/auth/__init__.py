"""Who may read: key providers (where the master keys come from) and the embedded Rego
policy's evaluation."""
