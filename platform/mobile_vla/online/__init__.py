"""Online and adaptive updates: durable fleet feedback, the promotion gate, the online update job."""
