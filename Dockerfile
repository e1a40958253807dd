# The API image; the same image runs workers with `email-service worker`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml setup.cfg README.md ./
COPY spec ./spec
COPY email_service ./email_service
RUN pip install . \
    && useradd --system --uid 10001 --home /nonexistent email

USER email
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4).status != 200)"
CMD ["email-service", "serve", "--host", "0.0.0.0", "--port", "5000"]
