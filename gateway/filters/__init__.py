"""
Request filters: each module registers its config keys
(L{gateway.config.register}) and its filter (L{gateway.pipeline.register_filter})
when imported, and is listed in L{gateway.config.FEATURE_MODULES}.

  - L{gateway.filters.security_headers}: response security headers (15)
  - L{gateway.filters.ip_rules}: client IP allow/deny lists (20)
  - L{gateway.filters.cors}: CORS preflights and response headers (30)
  - L{gateway.filters.auth}: API keys and JWT (40)
  - L{gateway.filters.rate_limit}: rate limits, 429 (50)
  - L{gateway.filters.rewrite}: path and header rewrites (80)

The policies themselves (L{gateway.cors}, L{gateway.auth}, ...) do no I/O
and know nothing of requests; these modules wire them to the pipeline.
"""
