"""`mobile-vla doctor`: checks the parts of the stack a first run needs and prints the fix for each."""
