"""ft-prog programs and the `ft-prog` command line."""
