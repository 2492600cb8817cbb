"""The command line against a real daemon: xl's verbs and columns, config files, errors and
exit codes, output that keeps every field, and what each verb loads."""
