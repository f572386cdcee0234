/*
 * vncprobe: a VNC client on LibVNCClient (an RFB implementation independent of
 * isola-display) for Isola's display tests and benchmark.
 *
 *   vncprobe HOST PORT ENCODINGS OUT.ppm [ACTION...]
 *
 * HOST is a host name, or the path of a Unix socket (PORT is then ignored). ENCODINGS is
 * LibVNCClient's list, e.g. "raw" or "zrle". The client asks for 32-bit pixels with red in
 * the lowest byte (not the server's native order, so the server converts). It waits for
 * the first complete framebuffer update, writes it to OUT.ppm, then runs each ACTION:
 *
 *   key:KEYSYM        press and release KEYSYM (hex or decimal)
 *   click:X,Y         left button down and up at X,Y
 *   size:W,H          wait (up to 10 s) until the framebuffer is W x H, then write OUT.ppm again
 *   frames:SECS       count updates for SECS seconds; prints "frames N pixels P secs S"
 *
 * It prints "size W H" after the first update and "cursor W H HOTX HOTY OPAQUE" whenever
 * the server sends a cursor shape. Exit status 0 on success.
 */
#include <rfb/rfbclient.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

static int updates_done;
static unsigned long long pixels_seen;

static void finished(rfbClient *c) { (void)c; updates_done++; }

static void got_update(rfbClient *c, int x, int y, int w, int h)
{
    (void)c; (void)x; (void)y;
    pixels_seen += (unsigned long long)w * (unsigned long long)h;
}

static void got_cursor(rfbClient *c, int xhot, int yhot, int w, int h, int bpp)
{
    int opaque = 0;
    (void)bpp;
    if (c->rcMask)
        for (int i = 0; i < w * h; i++)
            opaque += c->rcMask[i] != 0;
    printf("cursor %d %d %d %d %d\n", w, h, xhot, yhot, opaque);
    fflush(stdout);
}

static double now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return tv.tv_sec + tv.tv_usec / 1e6;
}

static int pump(rfbClient *c, double seconds)
{
    double end = now() + seconds;
    while (now() < end) {
        int n = WaitForMessage(c, 100000);
        if (n < 0)
            return -1;
        if (n > 0 && !HandleRFBServerMessage(c))
            return -1;
        if (seconds <= 0)
            break;
    }
    return 0;
}

static int write_ppm(rfbClient *c, const char *path)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    fprintf(f, "P6\n%d %d\n255\n", c->width, c->height);
    for (int i = 0; i < c->width * c->height; i++) {
        uint8_t *p = c->frameBuffer + 4 * i;
        fputc(p[0], f);
        fputc(p[1], f);
        fputc(p[2], f);
    }
    return fclose(f);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: vncprobe HOST PORT ENCODINGS OUT.ppm [ACTION...]\n");
        return 2;
    }
    rfbClient *c = rfbGetClient(8, 3, 4);
    c->serverHost = strdup(argv[1]);
    c->serverPort = atoi(argv[2]);
    c->appData.encodingsString = argv[3];
    c->appData.useRemoteCursor = TRUE;
    c->canHandleNewFBSize = TRUE;
    c->FinishedFrameBufferUpdate = finished;
    c->GotFrameBufferUpdate = got_update;
    c->GotCursorShape = got_cursor;
    if (!rfbInitClient(c, NULL, NULL)) {
        fprintf(stderr, "vncprobe: cannot connect\n");
        return 1;
    }
    double deadline = now() + 10;
    while (updates_done == 0) {
        if (now() > deadline || pump(c, 0.1) < 0) {
            fprintf(stderr, "vncprobe: no framebuffer update\n");
            return 1;
        }
    }
    printf("size %d %d\n", c->width, c->height);
    fflush(stdout);
    if (write_ppm(c, argv[4]) != 0)
        return 1;
    for (int i = 5; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "key:", 4)) {
            uint32_t key = strtoul(a + 4, NULL, 0);
            if (!SendKeyEvent(c, key, TRUE) || !SendKeyEvent(c, key, FALSE))
                return 1;
        } else if (!strncmp(a, "click:", 6)) {
            int x, y;
            if (sscanf(a + 6, "%d,%d", &x, &y) != 2)
                return 2;
            if (!SendPointerEvent(c, x, y, 1) || !SendPointerEvent(c, x, y, 0))
                return 1;
        } else if (!strncmp(a, "size:", 5)) {
            int w, h;
            if (sscanf(a + 5, "%d,%d", &w, &h) != 2)
                return 2;
            deadline = now() + 10;
            while (c->width != w || c->height != h || updates_done < 2) {
                if (now() > deadline || pump(c, 0.1) < 0) {
                    fprintf(stderr, "vncprobe: size stayed %dx%d\n", c->width, c->height);
                    return 1;
                }
            }
            /* Let the update that follows the resize arrive. */
            pump(c, 0.5);
            printf("size %d %d\n", c->width, c->height);
            if (write_ppm(c, argv[4]) != 0)
                return 1;
        } else if (!strncmp(a, "frames:", 7)) {
            double secs = atof(a + 7);
            int before = updates_done;
            pixels_seen = 0;
            double start = now();
            if (pump(c, secs) < 0)
                return 1;
            printf("frames %d pixels %llu secs %.3f\n", updates_done - before, pixels_seen,
                   now() - start);
        } else {
            fprintf(stderr, "vncprobe: unknown action %s\n", a);
            return 2;
        }
        fflush(stdout);
    }
    /* Give the server time to read the last events before the socket closes. */
    pump(c, 0.3);
    rfbClientCleanup(c);
    return 0;
}
