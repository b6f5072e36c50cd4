# e911-sip: the SIP edge and provisioning API in one image.
#   docker build -t e911-sip .
#   docker run --rm -p 5070:5070/udp -p 5070:5070/tcp -p 9100:9100 -p 9200:9200 \
#       -v e911-state:/var/lib/e911-sip -v /srv/e911-sip/tls:/etc/e911-sip/tls:ro \
#       -e E911_SIP__SIP__ADVERTISE=203.0.113.10 ... e911-sip
# config/e911-sip.container.toml lists the environment a deployment sets and the TLS files
# mounted at /etc/e911-sip/tls/: the provisioning API and /metrics are served over HTTPS.
FROM python:3.11-slim-bookworm AS build
# A C compiler for the modules setup.py compiles with mypyc and the C ones beside them
# (e911_sip/build.py lists both); the runtime image needs none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# The check imports every compiled module, and the edge's import the runtime dependencies:
# they are installed beside the package, from the wheels just built.
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && pip install --no-cache-dir --no-index --find-links /wheels --target wheel-check e911-sip \
    && PYTHONPATH=wheel-check python -m e911_sip.build --require-compiled

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10911 --home-dir /nonexistent --shell /usr/sbin/nologin e911 \
    && install -d -o e911 -g e911 /var/lib/e911-sip
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config /etc/e911-sip
USER e911
# SIP (UDP and TCP), metrics/health (HTTPS), provisioning API (HTTPS).
EXPOSE 5070/udp 5070/tcp 9100/tcp 9200/tcp
# The check talks to the process it runs beside, over loopback, so it does not verify the
# server's certificate (issued for the public name, not 127.0.0.1). It presents
# /etc/e911-sip/tls/healthcheck.crt when that is mounted, for [http] with client certificates.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
    CMD python -c "import os, ssl, urllib.request; \
tls = '/etc/e911-sip/tls/'; \
context = ssl.create_default_context(); \
context.check_hostname = False; \
context.verify_mode = ssl.CERT_NONE; \
os.path.exists(tls + 'healthcheck.crt') and context.load_cert_chain(tls + 'healthcheck.crt', tls + 'healthcheck.key'); \
urllib.request.urlopen('https://127.0.0.1:9100/healthz', timeout=2, context=context)" || exit 1
# SIGTERM drains: in-flight transactions finish and emergency dialogs keep their route.
STOPSIGNAL SIGTERM
ENTRYPOINT ["e911-sip"]
VOLUME ["/var/lib/e911-sip"]
CMD ["serve", "--config", "/etc/e911-sip/e911-sip.container.toml"]
