/* A leaf device's HTTPS client on mbedTLS 2.28 (Debian's libmbedtls-dev): what an ESP-IDF or
 * Zephyr leaf does when it calls the API.
 *
 *   mbedtls_client [options] HOST PORT NAME CAFILE
 *
 * Connects to HOST:PORT, verifies the server's chain against CAFILE and its certificate against
 * NAME (sent as SNI too), then, if asked, sends one HTTP/1.1 request and prints the status line
 * and the body. Options:
 *   -c CERT -k KEY    a client certificate and its key (mTLS)
 *   -m METHOD -P PATH the request (without -P: no request, only the handshake)
 *   -H "Name: value"  a header line (repeatable)
 *   -d BODY | -D FILE the request body
 *   -C LIST           TLS 1.2 cipher suites, IANA names separated by ':' (default: mbedTLS's)
 * Exit status: 0 verified (and, with a request, a response was read), 2 the handshake or the
 * verification failed, 3 the request failed after a verified handshake, 1 bad usage. On failure
 * it prints mbedTLS's error code and text, and the verification flags.
 *
 * Limitation: mbedTLS 2.28 matches NAME only against dNSName subjectAltNames and the CN; it
 * cannot verify an IP address subjectAltName (iPAddress entries are skipped), so an IP literal
 * as NAME fails with MBEDTLS_X509_BADCERT_CN_MISMATCH even when the certificate lists it.
 * mbedTLS 2.28 speaks TLS 1.2 only (its TLS 1.3 is an experimental build option). */

#define _GNU_SOURCE
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/ssl.h>
#include <mbedtls/ssl_ciphersuites.h>
#include <mbedtls/x509_crt.h>

#define TIMEOUT_MS 20000
#define MAX_HEADERS 16
#define MAX_SUITES 32

static void lib_error(const char *what, int ret)
{
    char text[256];
    mbedtls_strerror(ret, text, sizeof text);
    fprintf(stderr, "error: %s: -0x%04x %s\n", what, (unsigned)-ret, text);
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap)
            buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    *len = n;
    return buf;
}

static int write_all(mbedtls_ssl_context *ssl, const char *data, size_t len)
{
    while (len > 0) {
        int ret = mbedtls_ssl_write(ssl, (const unsigned char *)data, len);
        if (ret == MBEDTLS_ERR_SSL_WANT_READ || ret == MBEDTLS_ERR_SSL_WANT_WRITE)
            continue;
        if (ret < 0)
            return ret;
        data += ret;
        len -= (size_t)ret;
    }
    return 0;
}

/* The response's end: Content-Length bytes after the headers, else the end of the stream. */
static long response_end(const char *buf, size_t n)
{
    const char *end = memmem(buf, n, "\r\n\r\n", 4);
    if (!end)
        return -1;
    long body_at = (long)(end - buf) + 4;
    for (const char *p = buf; p < end; p++) {
        if ((p == buf || p[-1] == '\n') && strncasecmp(p, "Content-Length:", 15) == 0)
            return body_at + strtol(p + 15, NULL, 10);
    }
    return -1;
}

static void print_response(const char *buf, size_t n)
{
    const char *eol = memmem(buf, n, "\r\n", 2);
    const char *end = memmem(buf, n, "\r\n\r\n", 4);
    if (!eol || !end) {
        fwrite(buf, 1, n, stdout);
        return;
    }
    fwrite(buf, 1, (size_t)(eol - buf), stdout);
    fputc('\n', stdout);
    fwrite(end + 4, 1, n - (size_t)(end + 4 - buf), stdout);
    fputc('\n', stdout);
}

int main(int argc, char **argv)
{
    const char *cert = NULL, *key = NULL, *method = "GET", *path = NULL, *body = NULL, *ciphers = NULL;
    const char *headers[MAX_HEADERS];
    int nheaders = 0, opt;
    size_t body_len = 0;
    while ((opt = getopt(argc, argv, "c:k:m:P:H:d:D:C:")) != -1) {
        switch (opt) {
        case 'c': cert = optarg; break;
        case 'k': key = optarg; break;
        case 'm': method = optarg; break;
        case 'P': path = optarg; break;
        case 'H':
            if (nheaders == MAX_HEADERS) {
                fprintf(stderr, "too many headers\n");
                return 1;
            }
            headers[nheaders++] = optarg;
            break;
        case 'd': body = optarg; body_len = strlen(optarg); break;
        case 'D':
            if (!(body = read_file(optarg, &body_len)))
                return 1;
            break;
        case 'C': ciphers = optarg; break;
        default: goto usage;
        }
    }
    if (argc - optind != 4 || (cert == NULL) != (key == NULL))
        goto usage;
    const char *host = argv[optind], *port = argv[optind + 1], *name = argv[optind + 2], *cafile = argv[optind + 3];

    mbedtls_net_context net;
    mbedtls_ssl_context ssl;
    mbedtls_ssl_config conf;
    mbedtls_x509_crt ca, own;
    mbedtls_pk_context pk;
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
    int suites[MAX_SUITES + 1];
    int ret, status = 2;
    mbedtls_net_init(&net);
    mbedtls_ssl_init(&ssl);
    mbedtls_ssl_config_init(&conf);
    mbedtls_x509_crt_init(&ca);
    mbedtls_x509_crt_init(&own);
    mbedtls_pk_init(&pk);
    mbedtls_entropy_init(&entropy);
    mbedtls_ctr_drbg_init(&drbg);

    if ((ret = mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy, NULL, 0)) != 0) {
        lib_error("seeding the random generator", ret);
        goto out;
    }
    if ((ret = mbedtls_x509_crt_parse_file(&ca, cafile)) != 0) {
        lib_error("loading the CA file", ret);
        goto out;
    }
    if ((ret = mbedtls_ssl_config_defaults(&conf, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                           MBEDTLS_SSL_PRESET_DEFAULT)) != 0) {
        lib_error("configuring", ret);
        goto out;
    }
    mbedtls_ssl_conf_authmode(&conf, MBEDTLS_SSL_VERIFY_REQUIRED);
    mbedtls_ssl_conf_ca_chain(&conf, &ca, NULL);
    mbedtls_ssl_conf_rng(&conf, mbedtls_ctr_drbg_random, &drbg);
    mbedtls_ssl_conf_read_timeout(&conf, TIMEOUT_MS);
    if (ciphers) {
        int n = 0;
        char *list = strdup(ciphers), *save = NULL;
        for (char *s = strtok_r(list, ":", &save); s; s = strtok_r(NULL, ":", &save)) {
            int id = mbedtls_ssl_get_ciphersuite_id(s);
            if (id == 0 || n == MAX_SUITES) {
                fprintf(stderr, "error: unknown cipher suite %s\n", s);
                goto out;
            }
            suites[n++] = id;
        }
        suites[n] = 0;
        mbedtls_ssl_conf_ciphersuites(&conf, suites);
    }
    if (cert) {
        if ((ret = mbedtls_x509_crt_parse_file(&own, cert)) != 0) {
            lib_error("loading the client certificate", ret);
            goto out;
        }
        if ((ret = mbedtls_pk_parse_keyfile(&pk, key, NULL)) != 0) {
            lib_error("loading the client key", ret);
            goto out;
        }
        if ((ret = mbedtls_ssl_conf_own_cert(&conf, &own, &pk)) != 0) {
            lib_error("setting the client certificate", ret);
            goto out;
        }
    }
    if ((ret = mbedtls_ssl_setup(&ssl, &conf)) != 0 || (ret = mbedtls_ssl_set_hostname(&ssl, name)) != 0) {
        lib_error("setting up", ret);
        goto out;
    }
    if ((ret = mbedtls_net_connect(&net, host, port, MBEDTLS_NET_PROTO_TCP)) != 0) {
        lib_error("connecting", ret);
        goto out;
    }
    mbedtls_ssl_set_bio(&ssl, &net, mbedtls_net_send, NULL, mbedtls_net_recv_timeout);
    while ((ret = mbedtls_ssl_handshake(&ssl)) != 0) {
        if (ret != MBEDTLS_ERR_SSL_WANT_READ && ret != MBEDTLS_ERR_SSL_WANT_WRITE) {
            lib_error("handshake", ret);
            uint32_t flags = mbedtls_ssl_get_verify_result(&ssl);
            if (flags != 0 && flags != (uint32_t)-1) {
                char info[512];
                mbedtls_x509_crt_verify_info(info, sizeof info, "  ", flags);
                fprintf(stderr, "verify flags 0x%08x:\n%s", (unsigned)flags, info);
            }
            goto out;
        }
    }
    uint32_t flags = mbedtls_ssl_get_verify_result(&ssl);
    if (flags != 0) {  /* cannot happen with VERIFY_REQUIRED; checked all the same */
        fprintf(stderr, "error: not verified: flags 0x%08x\n", (unsigned)flags);
        goto out;
    }
    fprintf(stderr, "verified: %s, %s\n", mbedtls_ssl_get_version(&ssl), mbedtls_ssl_get_ciphersuite(&ssl));
    status = 0;
    if (!path)
        goto close;

    status = 3;
    size_t cap = 1024 + body_len;
    for (int i = 0; i < nheaders; i++)
        cap += strlen(headers[i]) + 2;
    char *req = malloc(cap + strlen(method) + strlen(path) + strlen(name));
    int len = sprintf(req, "%s %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\nContent-Length: %zu\r\n",
                      method, path, name, port, body_len);
    for (int i = 0; i < nheaders; i++)
        len += sprintf(req + len, "%s\r\n", headers[i]);
    len += sprintf(req + len, "\r\n");
    if ((ret = write_all(&ssl, req, (size_t)len)) != 0 || (body_len && (ret = write_all(&ssl, body, body_len)) != 0)) {
        lib_error("sending the request", ret);
        goto out;
    }
    size_t rcap = 16384, n = 0;
    char *resp = malloc(rcap);
    for (;;) {
        long want = response_end(resp, n);
        if (want >= 0 && n >= (size_t)want)
            break;
        if (n == rcap)
            resp = realloc(resp, rcap *= 2);
        ret = mbedtls_ssl_read(&ssl, (unsigned char *)resp + n, rcap - n);
        if (ret == MBEDTLS_ERR_SSL_WANT_READ || ret == MBEDTLS_ERR_SSL_WANT_WRITE)
            continue;
        if (ret == 0 || ret == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY)
            break;
        if (ret < 0) {
            lib_error("reading the response", ret);
            goto out;
        }
        n += (size_t)ret;
    }
    if (n == 0) {
        fprintf(stderr, "error: no response\n");
        goto out;
    }
    print_response(resp, n);
    status = 0;
close:
    mbedtls_ssl_close_notify(&ssl);
out:
    mbedtls_net_free(&net);
    mbedtls_ssl_free(&ssl);
    mbedtls_ssl_config_free(&conf);
    mbedtls_x509_crt_free(&ca);
    mbedtls_x509_crt_free(&own);
    mbedtls_pk_free(&pk);
    mbedtls_ctr_drbg_free(&drbg);
    mbedtls_entropy_free(&entropy);
    return status;
usage:
    fprintf(stderr, "usage: %s [-c CERT -k KEY] [-m METHOD] [-P PATH] [-H HEADER]... [-d BODY | -D FILE] "
                    "[-C SUITES] HOST PORT NAME CAFILE\n", argv[0]);
    return 1;
}
