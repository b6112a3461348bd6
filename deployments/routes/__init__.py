"""The HTTP routers, one per resource: jobs, listings, operations (health, metrics, page), A1111. Each calls
the job service and the libraries through `deployments.services`; none imports another or touches the store."""
