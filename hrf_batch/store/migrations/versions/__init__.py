"""Schema revisions, oldest first: 0001 core tables, 0002 HRF burden views, 0003 anatomy."""
