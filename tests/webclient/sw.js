// A faithful equivalent (not a copy) of Element Web's service worker,
// element-hq/element-web src/serviceworker/index.ts: the authenticated media (MSC3916)
// rewrite that makes <img> and fetch() of legacy media URLs work on a server with
// authenticated media. What it does, as Element's does:
//  * only GETs whose path starts with /_matrix/media/v3/download or /_matrix/media/v3/thumbnail;
//  * asks the page (postMessage {type: "userinfo", responseKey}) for user id, device id and
//    homeserver URL, reads the access token from IndexedDB (tokens stored without a pickle
//    key are plain strings there), and refuses to attach it to another origin than the
//    homeserver's;
//  * GETs <origin>/_matrix/client/versions with the token and treats "v1.11" as support
//    for authenticated media (cached two hours);
//  * then rewrites /media/v3/<kind>/ to /client/v1/media/<kind>/ and re-issues the request as
//    fetch(url, {headers: {Authorization: "Bearer <token>"}}): default mode (cors), default
//    redirect mode (follow), default credentials (same-origin); without a token, the
//    original URL with no options. Any error: the original URL, without the token.
"use strict";

const support = {};

self.addEventListener("install", (event) => event.waitUntil(self.skipWaiting()));
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("fetch", (event) => {
    if (event.request.method !== "GET") return;
    const url = new URL(event.request.url);
    if (!url.pathname.startsWith("/_matrix/media/v3/download") &&
        !url.pathname.startsWith("/_matrix/media/v3/thumbnail")) {
        return;
    }
    event.respondWith((async () => {
        let token;
        try {
            const api = url.origin;
            await new Promise((resolve) => setTimeout(resolve, Math.random() * 10));
            const client = await self.clients.get(event.clientId);
            const auth = await authData(client);
            if (url.origin !== new URL(auth.homeserver).origin) {
                throw new Error("media request for another server than the homeserver");
            }
            token = auth.accessToken;
            await updateSupport(api, token);
            if (support[api].authedMedia && token) {
                url.href = url.href.replace(/\/media\/v3\/(.*)\//, "/client/v1/media/$1/");
            }
        } catch (err) {
            token = undefined;
            console.error("SW: media request not rewritten", err);
        }
        return fetch(url, requestInit(token));
    })());
});

function requestInit(token) {
    return token ? { headers: { Authorization: `Bearer ${token}` } } : undefined;
}

async function updateSupport(api, token) {
    if (support[api]?.expires > Date.now()) return;
    const versions = await (await fetch(`${api}/_matrix/client/versions`, requestInit(token))).json();
    support[api] = {
        authedMedia: Boolean(versions?.versions?.includes("v1.11")),
        expires: Date.now() + 2 * 60 * 60 * 1000,
    };
}

function idbLoad(table, key) {
    return new Promise((resolve, reject) => {
        const open = indexedDB.open("matrix-react-sdk", 1);
        open.onupgradeneeded = () => {
            open.result.createObjectStore("pickleKey");
            open.result.createObjectStore("account");
        };
        open.onerror = () => reject(open.error);
        open.onsuccess = () => {
            const get = open.result.transaction([table], "readonly").objectStore(table).get(key);
            get.onsuccess = () => { resolve(get.result); open.result.close(); };
            get.onerror = () => reject(get.error);
        };
    });
}

async function authData(client) {
    const accessToken = await idbLoad("account", "mx_access_token");
    const { homeserver } = await askClient(client);
    if (!homeserver) throw new Error("the page has no logged-in session");
    return { accessToken, homeserver };
}

function askClient(client) {
    return new Promise((resolve, reject) => {
        const responseKey = Math.random().toString(36);
        const timer = setTimeout(() => {
            self.removeEventListener("message", listener);
            reject(new Error("timeout in postMessage"));
        }, 1000);
        const listener = (event) => {
            if (event.data?.responseKey !== responseKey) return;
            clearTimeout(timer);
            self.removeEventListener("message", listener);
            resolve(event.data);
        };
        self.addEventListener("message", listener);
        client.postMessage({ responseKey, type: "userinfo" });
    });
}
