// Vite serves the page; everything under /api goes to relay (make run), in dev and preview.
import react from '@vitejs/plugin-react';
import { defineConfig } from 'vite';

const relay = process.env.RELAY_URL || 'http://127.0.0.1:8000';

/** @type {import('vite').ProxyOptions} */
const toRelay = {
  target: relay,
  // No changeOrigin: the Host header stays the page's own (127.0.0.1:5173, say), so relay's
  // Origin check on POSTs (Origin must name the Host) passes, and its guest cookie is the
  // page's. With changeOrigin the dev server's origin would have to be listed in
  // RELAY_ALLOWED_ORIGINS.
  configure(proxy) {
    // Server-Sent Events: the proxy pipes each chunk through as it arrives (and proxied
    // responses never reach `vite preview`'s compression). Forward no Accept-Encoding either,
    // so nothing between relay and the page ever holds events back to compress them.
    proxy.on('proxyReq', (proxyReq) => proxyReq.removeHeader('accept-encoding'));
  },
};

export default defineConfig({
  plugins: [react()],
  server: { proxy: { '/api': toRelay } },
  preview: { proxy: { '/api': toRelay } },
});
