// The page side of a web client shaped like Element Web: media is rendered from the
// legacy /_matrix/media/v3 URLs (matrix-js-sdk's mxcUrlToHttp without authentication),
// and the service worker (sw.js) turns them into authenticated requests. Like Element's
// WebPlatform, the page answers the worker's "userinfo" postMessage from localStorage, and
// keeps the access token in IndexedDB ("matrix-react-sdk" / "account" / "mx_access_token"),
// where the worker reads it.
"use strict";

const IDB_NAME = "matrix-react-sdk";

function openIdb() {
    return new Promise((resolve, reject) => {
        const req = indexedDB.open(IDB_NAME, 1);
        req.onupgradeneeded = () => {
            req.result.createObjectStore("pickleKey");
            req.result.createObjectStore("account");
        };
        req.onsuccess = () => resolve(req.result);
        req.onerror = () => reject(req.error);
    });
}

async function idbWrite(table, key, value) {
    const db = await openIdb();
    await new Promise((resolve, reject) => {
        const txn = db.transaction([table], "readwrite");
        if (value === undefined) txn.objectStore(table).delete(key);
        else txn.objectStore(table).put(value, key);
        txn.oncomplete = resolve;
        txn.onerror = () => reject(txn.error);
    });
    db.close();
}

navigator.serviceWorker.addEventListener("message", (event) => {
    if (event.data?.type !== "userinfo" || !event.data?.responseKey) return;
    event.source.postMessage({
        responseKey: event.data.responseKey,
        userId: localStorage.getItem("mx_user_id"),
        deviceId: localStorage.getItem("mx_device_id"),
        homeserver: localStorage.getItem("mx_hs_url"),
    });
});

// Resolves once the worker controls this page (it claims its clients on activation).
window.clientReady = (async () => {
    await navigator.serviceWorker.register("sw.js");
    await navigator.serviceWorker.ready;
    if (!navigator.serviceWorker.controller) {
        await new Promise((resolve) =>
            navigator.serviceWorker.addEventListener("controllerchange", resolve, { once: true }));
    }
    return true;
})();

window.login = async (homeserver, userId, deviceId, accessToken) => {
    localStorage.setItem("mx_hs_url", homeserver);
    localStorage.setItem("mx_user_id", userId);
    localStorage.setItem("mx_device_id", deviceId);
    await idbWrite("account", "mx_access_token", accessToken);
};

window.logout = async () => {
    for (const key of ["mx_hs_url", "mx_user_id", "mx_device_id"]) localStorage.removeItem(key);
    await idbWrite("account", "mx_access_token", undefined);
};

// What Element renders for an image event: <img src="…/_matrix/media/v3/…">.
window.showImage = (url) => new Promise((resolve) => {
    const img = document.createElement("img");
    img.onload = () => resolve({ loaded: true, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight });
    img.onerror = () => resolve({ loaded: false, naturalWidth: img.naturalWidth, naturalHeight: 0 });
    img.src = url;
    document.getElementById("media").appendChild(img);
});

// What Element's Media.downloadSource() does for a file: fetch(src), then the bytes.
window.fetchSha256 = async (url) => {
    let response;
    try {
        response = await fetch(url);
    } catch (e) {
        return { error: String(e) };
    }
    const bytes = await response.arrayBuffer();
    const digest = await crypto.subtle.digest("SHA-256", bytes);
    const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
    return { status: response.status, length: bytes.byteLength, sha256: response.ok ? hex : null,
             redirected: response.redirected, type: response.type };
};
