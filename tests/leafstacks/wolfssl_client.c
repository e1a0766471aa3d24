/* A leaf device's HTTPS client on wolfSSL 5.5 (Debian's libwolfssl-dev): what a wolfSSL-based
 * leaf does when it calls the API.
 *
 *   wolfssl_client [options] HOST PORT NAME CAFILE
 *
 * Connects to HOST:PORT, verifies the server's chain against CAFILE and its certificate against
 * NAME with wolfSSL_check_domain_name (a DNS name is sent as SNI too; an IP literal is not, as
 * RFC 6066 wants, and is matched against the certificate's iPAddress subjectAltNames, which
 * this build of wolfSSL (OPENSSL_ALL) compares in their text form), then, if asked, sends one
 * HTTP/1.1 request and prints the status line and the body. Options:
 *   -c CERT -k KEY    a client certificate and its key (mTLS)
 *   -m METHOD -P PATH the request (without -P: no request, only the handshake)
 *   -H "Name: value"  a header line (repeatable)
 *   -d BODY | -D FILE the request body
 *   -C LIST           cipher suites, wolfSSL/OpenSSL names separated by ':'
 *   -2 | -3           TLS 1.2 only | TLS 1.3 only (default: either, 1.3 preferred)
 * Exit status: 0 verified (and, with a request, a response was read), 2 the handshake or the
 * verification failed, 3 the request failed after a verified handshake, 1 bad usage. On failure
 * it prints wolfSSL's error code and text, and the verification result. */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <getopt.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#define TIMEOUT_S 20
#define MAX_HEADERS 16

static void lib_error(WOLFSSL *ssl, const char *what, int ret)
{
    char text[WOLFSSL_MAX_ERROR_SZ];
    int err = ssl ? wolfSSL_get_error(ssl, ret) : ret;
    wolfSSL_ERR_error_string_n((unsigned long)err, text, sizeof text);
    fprintf(stderr, "error: %s: %d %s\n", what, err, text);
    if (ssl) {
        long verify = wolfSSL_get_verify_result(ssl);
        if (verify != 0)
            fprintf(stderr, "verify result %ld: %s\n", verify, wolfSSL_X509_verify_cert_error_string(verify));
    }
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

static int connect_to(const char *host, const char *port)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res, *ai;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "error: %s: %s\n", host, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0)
            continue;
        struct timeval tv = {.tv_sec = TIMEOUT_S};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        perror("error: connecting");
    return fd;
}

static int write_all(WOLFSSL *ssl, const char *data, size_t len)
{
    while (len > 0) {
        int ret = wolfSSL_write(ssl, data, (int)len);
        if (ret <= 0)
            return ret;
        data += ret;
        len -= (size_t)ret;
    }
    return 1;
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
    int nheaders = 0, opt, version = 0;
    size_t body_len = 0;
    while ((opt = getopt(argc, argv, "c:k:m:P:H:d:D:C:23")) != -1) {
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
        case '2': version = 2; break;
        case '3': version = 3; break;
        default: goto usage;
        }
    }
    if (argc - optind != 4 || (cert == NULL) != (key == NULL))
        goto usage;
    const char *host = argv[optind], *port = argv[optind + 1], *name = argv[optind + 2], *cafile = argv[optind + 3];
    unsigned char addr[16];
    int is_ip = inet_pton(AF_INET, name, addr) == 1 || inet_pton(AF_INET6, name, addr) == 1;

    WOLFSSL_CTX *ctx = NULL;
    WOLFSSL *ssl = NULL;
    int fd = -1, ret, status = 2;
    wolfSSL_Init();
    ctx = wolfSSL_CTX_new(version == 2 ? wolfTLSv1_2_client_method()
                          : version == 3 ? wolfTLSv1_3_client_method() : wolfSSLv23_client_method());
    if (!ctx) {
        fprintf(stderr, "error: wolfSSL_CTX_new failed\n");
        goto out;
    }
    if ((ret = wolfSSL_CTX_SetMinVersion(ctx, WOLFSSL_TLSV1_2)) != WOLFSSL_SUCCESS) {
        lib_error(NULL, "setting TLS 1.2 as the minimum", ret);
        goto out;
    }
    if ((ret = wolfSSL_CTX_load_verify_locations(ctx, cafile, NULL)) != WOLFSSL_SUCCESS) {
        lib_error(NULL, "loading the CA file", ret);
        goto out;
    }
    wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_PEER, NULL);
    if (ciphers && (ret = wolfSSL_CTX_set_cipher_list(ctx, ciphers)) != WOLFSSL_SUCCESS) {
        lib_error(NULL, "setting the cipher suites", ret);
        goto out;
    }
    if (cert) {
        if ((ret = wolfSSL_CTX_use_certificate_chain_file(ctx, cert)) != WOLFSSL_SUCCESS) {
            lib_error(NULL, "loading the client certificate", ret);
            goto out;
        }
        if ((ret = wolfSSL_CTX_use_PrivateKey_file(ctx, key, WOLFSSL_FILETYPE_PEM)) != WOLFSSL_SUCCESS) {
            lib_error(NULL, "loading the client key", ret);
            goto out;
        }
    }
    if (!(ssl = wolfSSL_new(ctx))) {
        fprintf(stderr, "error: wolfSSL_new failed\n");
        goto out;
    }
    if ((ret = wolfSSL_check_domain_name(ssl, name)) != WOLFSSL_SUCCESS) {
        lib_error(ssl, "setting the name to verify", ret);
        goto out;
    }
    if (!is_ip && (ret = wolfSSL_UseSNI(ssl, WOLFSSL_SNI_HOST_NAME, name, (unsigned short)strlen(name)))
                      != WOLFSSL_SUCCESS) {
        lib_error(ssl, "setting SNI", ret);
        goto out;
    }
    if ((fd = connect_to(host, port)) < 0)
        goto out;
    wolfSSL_set_fd(ssl, fd);
    if ((ret = wolfSSL_connect(ssl)) != WOLFSSL_SUCCESS) {
        lib_error(ssl, "handshake", ret);
        goto out;
    }
    if (wolfSSL_get_verify_result(ssl) != 0) {  /* cannot happen with VERIFY_PEER; checked all the same */
        lib_error(ssl, "not verified", 0);
        goto out;
    }
    fprintf(stderr, "verified: %s, %s\n", wolfSSL_get_version(ssl), wolfSSL_get_cipher_name(ssl));
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
    if ((ret = write_all(ssl, req, (size_t)len)) <= 0 || (body_len && (ret = write_all(ssl, body, body_len)) <= 0)) {
        lib_error(ssl, "sending the request", ret);
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
        ret = wolfSSL_read(ssl, resp + n, (int)(rcap - n));
        if (ret <= 0) {
            int err = wolfSSL_get_error(ssl, ret);
            if (err == WOLFSSL_ERROR_ZERO_RETURN || err == SOCKET_PEER_CLOSED_E || (ret == 0 && n > 0))
                break;
            lib_error(ssl, "reading the response", ret);
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
    wolfSSL_shutdown(ssl);
out:
    if (ssl)
        wolfSSL_free(ssl);
    if (fd >= 0)
        close(fd);
    if (ctx)
        wolfSSL_CTX_free(ctx);
    wolfSSL_Cleanup();
    return status;
usage:
    fprintf(stderr, "usage: %s [-c CERT -k KEY] [-m METHOD] [-P PATH] [-H HEADER]... [-d BODY | -D FILE] "
                    "[-C SUITES] [-2|-3] HOST PORT NAME CAFILE\n", argv[0]);
    return 1;
}
